"""`colo view`: the real replicated pair, live and steppable, in a browser (colo.view.server, colo.view.session)."""
