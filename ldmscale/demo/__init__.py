"""ldmscale.demo: the real data the CPU demo and the tests train on, made offline (scikit-learn's handwritten digits
as LAION-layout shards). tools/make_digit_shards.py is its command line."""
