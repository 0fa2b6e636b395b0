"""Quantisation of a trained run into a verified, self-describing TFLite bundle."""

# TensorFlow's guidance for post-training calibration is a few hundred samples; with
# many classes 200 covered each class about three times and the int8 ranges missed the
# rarer ones (measured on a 73-class set). 500, stratified, every class at least once.
# Here, not in run.py, so the CLI parser can show it without importing OpenCV.
DEFAULT_CALIBRATION_IMAGES = 500
