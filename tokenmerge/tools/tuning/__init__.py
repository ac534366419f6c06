"""What ``tokenmerge tune`` is made of, so that each part can be read and tested alone:

* ``targets``: what a schedule must reach and the line that turns a time into a FLOP
  budget (arithmetic only);
* ``search``: the schedules within a FLOP budget and the search for the one that
  scores best, given any way to score a schedule (no timing);
* ``measuring``: what is run on the model: the calibration outputs that score a
  schedule, and the timings the FLOP line and the speed-up reached come from;
* ``tuner``: :func:`~tokenmerge.tools.tuning.tuner.tune`, the three together, and the
  :class:`~tokenmerge.tools.tuning.tuner.TuneResult` a schedule file is written from.
"""
