"""Index builder: turns sources (a folder of images; at LAION scale, embedding shards) into a bundle.

Every builder writes through core.bundle.BundleWriter, the one writer of the format.
images.py: a folder of reference images -> embeddings -> an exact (flat) bundle.
"""
