"""`nlmm dash`: the Textual dashboard that watches the store while training workers write to it.

The app reads the store through `nlmm.store`'s query functions, starts and stops runs only
through `nlmm.train.launcher`, and reaches models only through `nlmm.search` and the evaluate and
export helpers, so nothing here imports the training loop.
"""
