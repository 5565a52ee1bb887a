"""Runnable study definitions: model, data, search space and budget for each benchmark."""
