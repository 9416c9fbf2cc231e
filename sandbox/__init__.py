"""A local stand-in for Parallel's Task API over real HTTP (see /_sandbox/* for control).

    from sandbox.server import SandboxServer
    with SandboxServer() as sb:
        client = AsyncParallel(api_key="any", base_url=sb.url)
"""
