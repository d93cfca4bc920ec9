"""`nlmm dash`: the Textual dashboard that watches the store while training workers write to it.

One package per screen (runs/, run/, checkpoints/, compare/, search/) holds that screen and the
widgets only it shows; widgets/ holds the ones several screens share and dialogs/ the modals the
app opens. A screen posts its own nested messages for what outlives it; the app (app.py) handles
them and is the only place that starts, resumes or stops runs, through `nlmm.train.launcher`.
Workers report by messages too. Models are reached only through `nlmm.search.engine` and the evaluate
and export helpers, so nothing here imports the training loop.
"""
