"""Studies: sets of training runs planned, run (resumably) and reported together.

- :mod:`cskd.studies.runs`     what every study shares: run one config in a child process, reuse finished runs,
  collect results, mean ± std, the environment a report records
- :mod:`cskd.studies.demo`     ``cskd demo``: teacher, baseline and distilled students on synthetic scenes
- :mod:`cskd.studies.compare`  ``cskd compare``: methods side by side at equal iterations and equal training time
"""
