from prunecli.cli import main

main()
