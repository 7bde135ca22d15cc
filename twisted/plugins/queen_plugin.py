"""twistd plugin: ``twistd -n queen [options]`` runs the queen-tw server.

Kept tiny because twistd imports every plugin file to list them; the server itself is
imported only when this plugin is actually run.
"""

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from queen_tw.config import QueenOptions


@implementer(IServiceMaker, IPlugin)
class QueenServiceMaker:
    """Builds the queen-tw service tree from the parsed options."""

    tapname = "queen"
    description = "queen-tw: PostgreSQL-backed message queue server (Queen MQ compatible)"
    options = QueenOptions

    def makeService(self, options: QueenOptions) -> IService:
        """Hand the parsed Config to queen_tw.service.make_service, on a reactor that keeps
        monotonic time (queen_tw.clock)."""
        from twisted.internet import reactor

        from queen_tw.clock import keep_monotonic_time
        from queen_tw.service import make_service

        keep_monotonic_time(reactor)
        return make_service(options.config)


queen = QueenServiceMaker()
