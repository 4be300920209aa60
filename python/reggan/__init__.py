"""RegGAN: facial expression synthesis with a per-pixel regression layer refined by a GAN.

The application on top of reggan_ext's kernels: paired face data (`reggan.data`, and the
built-in procedural faces of `reggan.synthetic`), the models (`reggan.models`), stage-1 fitting
(`reggan.fit`), training (`reggan.train`), and the `reggan` command line (`reggan.cli`).
"""

__version__ = "0.1.0"
