"""Evaluation of world models (``matrix-world eval``): DESIGN.md §7's control, fidelity and drift numbers.

* ``metrics``: pure metric functions on arrays (PSNR, Fréchet distance, histograms, accuracy,
  drift buckets, reward / termination scores).
* ``idm``: the inverse-dynamics model that labels generated transitions, and its training.
* ``suite``: ``main(argv)``, composing both over a checkpoint and recorded data.

Nothing here is imported by the env or the model packages.
"""
