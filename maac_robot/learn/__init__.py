"""The learner (torch): ensemble, MAAC agent, trainer, ONNX export and diagnostics.

Installed with `pip install 'maac-robot[train]'`; nothing on the robot side imports it.
"""
