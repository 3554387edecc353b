"""The steps the verbs of ``prunecli.api`` are made of, each taking only its own part of the config.

``opening`` reads a model and its images, ``scoring`` scores channels, ``removal`` plans and removes them,
``latency_target`` is ``--latency-target``'s measure-and-correct loop, ``recovery`` holds BN recalibration,
reconstruction, soft pruning and EDP, ``pruning`` joins them into prune's removal stage, and ``checks`` checks a
pruned model (it runs, keeps its output shapes, is faster where it runs) before the format adapter writes it.
"""
