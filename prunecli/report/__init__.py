"""The only renderer: ``console`` (rich tables, ``-q``'s summary line, ``--json``), ``file`` (the before/after
report ``prune --report`` writes as JSON, Markdown or HTML) and ``events`` (training progress as lines of text)."""
