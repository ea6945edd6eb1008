"""Measurements taken on exported files: the machine (hardware), sizes, latency and accuracy, each in its own module.

Nothing here imports TensorFlow unless a Keras model is measured.
"""
