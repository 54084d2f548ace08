"""The commands, one thin module each (``python -m mergevq.entries.<name>`` or the ``mergevq-<name>``
console script): they read the Hydra config, check it (``config_check``), and call the library.

``cli`` is the shared Hydra main helper; ``sampling`` / ``sampling_randar`` are the ``sample``
command's generation loop and ``objective`` the value a training entry returns to a sweeper.
"""
