"""Peer pruning tools run as width methods: their structure, our Plan.

A peer (NVIDIA ModelOpt's FastNAS) prunes a copy of the model its own way; :mod:`.recover`
reads back which channels of every unit it kept, as a :class:`~autoprune.plan.Plan` that
reproduces its network, so the pipeline fine-tunes and reports it like any other method.
:mod:`.fastnas` runs ModelOpt's search (an optional extra: ``pip install -e ".[peers]"``).
"""
