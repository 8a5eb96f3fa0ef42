"""Notifications through apprise (NOTIFY_URLS), delivered from a background thread so a slow or
unreachable service never delays a decision."""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("ecoflow.policy.notify")

CATEGORIES = ("shutdown", "abort", "power", "station", "agent")


class Notifier:
    """Queues messages and sends them one by one; which categories go out is set by the
    NOTIFY_ON_* toggles."""

    def __init__(self, urls: list[str], enabled: set[str]):
        import apprise

        self._apprise = apprise.Apprise()
        for url in urls:
            if not self._apprise.add(url):
                # The URL may hold a token: name its scheme only.
                raise ValueError(f"NOTIFY_URLS: {url.split(':', 1)[0]}:// URL not understood")
        self._enabled = enabled
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue(maxsize=1000)
        threading.Thread(target=self._run, name="notify", daemon=True).start()

    @classmethod
    def from_settings(cls, settings) -> Notifier | None:
        if settings.notify_urls is None or not settings.notify_urls.get_secret_value().strip():
            return None
        urls = [u for u in settings.notify_urls.get_secret_value().replace(",", " ").split() if u]
        enabled = {c for c in CATEGORIES if getattr(settings, f"notify_on_{c}")}
        return cls(urls, enabled)

    def wants(self, category: str) -> bool:
        return category in self._enabled

    def send(self, title: str, body: str) -> None:
        try:
            self._queue.put_nowait((title, body))
        except queue.Full:
            log.error("notification queue full; dropped: %s", body)

    def _run(self) -> None:
        while True:
            title, body = self._queue.get()
            try:
                if not self._apprise.notify(title=title, body=body):
                    log.error("notification not delivered: %s", body)
            except Exception:
                log.exception("notification failed: %s", body)
