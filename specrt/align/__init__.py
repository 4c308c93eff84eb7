"""Task partitioning, drafter alignment and pool building: ``specrt align``
(:mod:`specrt.align.pipeline`; options in :mod:`specrt.align.config`, one module per
stage)."""
