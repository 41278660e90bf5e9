"""Serving a run's model: the predictor shared by `fedseek predict` and `fedseek serve`, and the HTTP service."""
