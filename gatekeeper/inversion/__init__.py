"""inspect/: detectors. They know nothing of files, YAML or Markdown."""
