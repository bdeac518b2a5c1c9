"""transferlab: how much does transfer learning buy on a small image dataset?"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `from transferlab import Classifier` without making every stage import torch at start-up.
    if name == "Classifier":
        from transferlab.predict import Classifier
        return Classifier
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
