"""What a person or Prometheus sees of a running job: ``metrics.py`` (the Prometheus table and exporter),
``progress.py`` (the progress bar or one plain line per logged step)."""
