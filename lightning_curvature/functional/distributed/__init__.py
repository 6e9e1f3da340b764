"""What several processes running one probe need from each other.

The agreement that makes one process's failure every process's, and the union-batch mean
of products. Pure torch; imports nothing of the package but its error classes, so every
other layer of ``functional/`` (``linalg/`` included) may use it.
"""
