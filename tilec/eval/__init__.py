"""Evaluating and using a trained detector.

- :mod:`tilec.eval.map`: mAP@0.5 the PASCAL VOC way, per class and overall.
- :mod:`tilec.eval.detect`: inference, scoring and non-maximum suppression.
- :mod:`tilec.eval.draw`: boxes drawn onto an image.
"""
