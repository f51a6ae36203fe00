"""A Django project in one module (settings, URLs, async views), knowing nothing of loopwatch:
``application`` is Django's ASGI handler. Its blocking route's template is
``items/<int:item_id>/block``, in Django's own syntax."""

from __future__ import annotations

import time

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="not-a-secret-" * 4,
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"], INSTALLED_APPS=[],
    )  # fmt: skip
    django.setup()

from django.core.asgi import get_asgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path

BLOCK_SECONDS = 0.3


async def block_item(request: HttpRequest, item_id: int) -> JsonResponse:
    time.sleep(BLOCK_SECONDS)  # the blocking line
    return JsonResponse({"item": item_id})


async def ok(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [path("items/<int:item_id>/block", block_item), path("ok", ok)]

application = get_asgi_application()
