"""ALSA audio: capture, playback with a drain callback, resampling, earcons."""
