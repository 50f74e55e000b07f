"""Waldo's studies and report writers, kept out of the library package ``waldo``.

The studies (test-time transforms, cross-dataset transfer) train and evaluate models through
``waldo``'s public modules and write JSON, CSV, Markdown and PNG reports; ``waldo`` itself never
imports this package, except ``waldo experiment``, the CLI door to :mod:`waldo_experiments.cli`.
Run ``python -m waldo_experiments --help`` (or ``waldo experiment --help``).
"""
