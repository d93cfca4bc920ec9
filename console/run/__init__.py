"""One run, live: its header, charts, CMS levels, GPU/host figures and log tail."""
