"""`shardwise serve`: the planner as a local web page (Starlette under uvicorn), the same `plan`
command line behind every request."""
