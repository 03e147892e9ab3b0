"""Running a segmentation: the Request every front end builds (CLI, worker, bench), the Runner that
loads the model once, keeps queries warm and dispatches to the method, the output writer, and
the background worker process with its JSON-lines protocol (a live session for clicks included) and
the client Slicer uses. Imports
``methods`` and everything below it.
"""
