"""transferlab: how much does transfer learning buy on a small image dataset?"""
__version__ = "0.1.0"
