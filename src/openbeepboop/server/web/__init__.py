"""The web interface at `/`: server-rendered pages over the same domain core as the API,
with small vendored libraries (no build step, no CDN). docs/web.md describes it."""
