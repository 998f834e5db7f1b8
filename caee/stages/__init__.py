"""One module per pipeline stage, each with ``main(cfg)``; the top-level scripts call these."""
