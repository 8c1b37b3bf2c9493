"""tlrefusal: find, test and remove the refusal direction of chat models on TransformerLens hooks.

A reimplementation of Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction".
The library is silent: it takes a progress reporter and returns value objects; only `tlrefusal.cli`
talks to the console.
"""
__version__ = "0.1.0"
