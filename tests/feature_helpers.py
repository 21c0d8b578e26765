"""Shared by the feature-cache and model-loading tests: a few texts and a forward-pass counter."""

TEXTS = ["the birch canoe slid on the smooth planks", "glue the sheet", "a", "rice is often served in round bowls"]


class Counter:
    """Counts forward passes of the model's body."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
