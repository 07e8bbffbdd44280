"""The web UI (`aceturbo ui`): a Gradio app over the same commands a user types.

``actions`` holds everything that is not UI (dataset edits, starting/stopping stage processes,
reading run folders) as plain functions, testable without a browser; ``app`` lays out the pages and
only wires widgets to those functions. Importing this package does not import gradio or torch.
"""
