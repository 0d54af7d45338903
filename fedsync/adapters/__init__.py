"""Adapters from machine-learning frameworks to the ``Trainer`` contract (extras).

Each module imports only numpy, :mod:`fedsync.trainer_api` and its framework, which is
an extra of the install: ``pip install "fedsync[sklearn]"`` for
:mod:`fedsync.adapters.sklearn`, ``pip install "fedsync[torch]"`` (or ``pip install
torch``) for :mod:`fedsync.adapters.torch`. The device core install needs neither.
"""
