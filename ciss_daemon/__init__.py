"""The ciss service: workspace, catalog, inbox, scheduler, jobs, promotion and CLI."""
