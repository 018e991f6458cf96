"""The server's routers; each receives the `ServerState` (service, worker, limits) and is included by
`app.create_app`: `sdapi` (AUTOMATIC1111's /sdapi/v1), `diffusekit` (/diffusekit/v1 helpers of the web UI),
`webui` (the page). Another API (ComfyUI's, say) is one more router beside them."""
