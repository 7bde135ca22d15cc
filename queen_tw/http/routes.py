"""The one place the route modules are put together into the site's root resource.

Each concern keeps its routes in its own small Klein app (messaging, resources, consumer
groups, system; auth, metrics or streams join the same way). :class:`Routes` gives a request
to the app whose URL map knows its path, so the apps need no shared prefix. A path no app
knows answers 404; a path some app knows under other methods answers 405 with ``Allow``.
In front of it all, :class:`~queen_tw.http.hot_routes.HotRoutes` takes push, pop and ack
straight to the messaging routes.
"""

from typing import Any, List, Optional, Sequence

from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect

from queen_tw.auth.levels import ROUTE_CONVERTERS, slash_refused
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.engine.timers import TimersEngine
from queen_tw.ephemeral.service import Ephemeral
from queen_tw.http.answers import json_answer, method_not_allowed, not_found
from queen_tw.http.dashboard import DashboardRoutes
from queen_tw.http.depth import DepthRoutes
from queen_tw.http.ephemeral import EphemeralRoutes
from queen_tw.http.groups import GroupRoutes
from queen_tw.http.hot_routes import HotRoutes
from queen_tw.http.kv import KvRoutes
from queen_tw.http.messaging import MessagingRoutes, PopDefaults
from queen_tw.http.metrics_routes import MetricsRoutes
from queen_tw.http.openapi import OpenApiRoutes
from queen_tw.http.reads import ReadRoutes
from queen_tw.http.resources import ResourceRoutes
from queen_tw.http.status import StatusRoutes
from queen_tw.http.streams import StreamRoutes
from queen_tw.http.system import SharedStateView, SystemRoutes
from queen_tw.http.timers import TimerRoutes
from queen_tw.maintenance import Maintenance
from queen_tw.metrics.wiring import Metrics

# GET routes that hand messages out. HEAD matches every GET rule (werkzeug) and Twisted then
# drops the body: on these it would lease or consume messages nobody receives, so HEAD is
# refused there (405) instead.
CONSUMING_GETS = frozenset({
    "/api/v1/pop", "/api/v1/pop/queue/<queue>", "/api/v1/pop/queue/<queue>/partition/<partition>",
    "/api/v1/ephemeral/pop"})


class Routes(Resource):
    """Dispatches each request to the route module that knows its path.

    Every app's rules are copied into one URL map whose endpoints name the app, so a request
    is matched once whatever the number of apps (trying each app's map in turn cost ~10 us
    per map before the right one, ~190 us for the last).

    :param route_sets: objects with a Klein ``app`` (bound to the object by attribute
        access); their paths must not overlap.
    """

    isLeaf = True

    def __init__(self, route_sets: Sequence[Any]):
        super().__init__()
        self._resources: List[IResource] = []
        self._map = Map(converters=ROUTE_CONVERTERS)
        for index, routes in enumerate(route_sets):
            app = routes.app  # bound to ``routes``: its methods receive ``self``
            self._resources.append(app.resource())
            for rule in app.url_map.iter_rules():
                copy = rule.empty()
                copy.endpoint = index
                self._map.add(copy)

    def render(self, request):
        # The path as Klein matches it: Twisted's percent-decoded segments.
        try:
            segments = [segment.decode("utf-8") for segment in request.postpath]
        except UnicodeDecodeError:
            return json_answer(request, 400, {"error": "The path is not valid UTF-8"})
        if slash_refused(segments):
            return json_answer(request, 400, {"error": "A name in the path must not contain '/'"})
        path = "/" + "/".join(segments)
        method = request.method.decode("latin-1")
        urls = self._map.bind("localhost", path_info=path, default_method=method)
        try:
            rule, _ = urls.match(return_rule=True)
        except MethodNotAllowed as err:
            allowed = set(err.valid_methods or ())
            if "GET" in allowed and urls.match(method="GET", return_rule=True)[0].rule \
                    in CONSUMING_GETS:
                allowed.discard("HEAD")  # answered 405 below: it would pop for nobody
            return method_not_allowed(request, allowed)
        except (NotFound, RequestRedirect):
            return not_found(request)  # a redirect would only merge slashes: no route has this path
        if method == "HEAD" and rule.rule in CONSUMING_GETS:
            return method_not_allowed(request, {"GET"})
        return self._resources[rule.endpoint].render(request)


def http_root(engine: QueueEngine, worker_id: str, pop_defaults: PopDefaults,
              admin: Optional[AdminEngines] = None,
              maintenance: Optional[Maintenance] = None,
              shared_state: Optional[SharedStateView] = None,
              metrics: Optional[Metrics] = None,
              ephemeral: Optional[Ephemeral] = None,
              timers: Optional[TimersEngine] = None) -> IResource:
    """The site's root: every route of WIRE.md, push/pop/ack through the hot shortcut.

    :param engine: the message path.
    :param worker_id: reported by ``/health``.
    :param pop_defaults: pop parameters a request leaves out.
    :param admin: consumer-group, browser, statistics and wake-up engines (404 without).
    :param maintenance: flags and file buffer of the system routes (404 without).
    :param shared_state: peer-sync statistics (None: sync off, ``not_initialized``).
    :param metrics: the process's metrics, for ``/metrics`` (404 without).
    :param timers: the timers' engine (WIRE2 3; 404 without).
    :param ephemeral: the ephemeral queues of this process (404 without).
    """
    sets = route_sets(engine, worker_id, pop_defaults, admin, maintenance, shared_state,
                      metrics, ephemeral=ephemeral, timers=timers)
    return HotRoutes(sets[0], Routes(sets))


def route_sets(engine: QueueEngine, worker_id: str, pop_defaults: PopDefaults,
               admin: Optional[AdminEngines] = None,
               maintenance: Optional[Maintenance] = None,
               shared_state: Optional[SharedStateView] = None,
               metrics: Optional[Metrics] = None,
               ephemeral: Optional[Ephemeral] = None,
               timers: Optional[TimersEngine] = None) -> List[Any]:
    """Every route module of the site, the messaging routes first (the hot shortcut calls
    them). The OpenAPI test reads their URL maps, so a route added here must be documented.
    Parameters as for :func:`http_root`."""
    return [
        MessagingRoutes(engine, pop_defaults),
        KvRoutes(engine),
        EphemeralRoutes(ephemeral),
        ResourceRoutes(engine, admin),
        DepthRoutes(engine),
        GroupRoutes(admin),
        StatusRoutes(admin),
        SystemRoutes(engine, worker_id, maintenance, shared_state),
        OpenApiRoutes(),
        StreamRoutes(engine),
        ReadRoutes(engine),
        DashboardRoutes(),
        MetricsRoutes(metrics),
        TimerRoutes(timers),
    ]
