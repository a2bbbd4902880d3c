"""Redis (the broker and the channel layer) down: an instance that was stored is answered as
stored. The row, file and audit row are committed before any Redis call; the completeness
check of a quiet study is scheduled later by the beat sweep, and a lost live event costs a
refresh. Before, the post-commit hooks raised: C-STORE answered 0x0110 and STOW-RS a 500 for
instances that were stored."""

import io

import pydicom
import pytest
from django.test import Client
from pynetdicom import AE

from tests.worklist.dicom_samples import phantom_series
from tests.worklist.test_dicomweb import multipart, stow
from worklist.models import AuditAction, AuditEvent, Instance
from worklist.receiver import start_receiver

DEAD = "redis://127.0.0.1:1/1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def redis_down(settings):  # type: ignore[no-untyped-def]
    settings.REDIS_URL = DEAD
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [DEAD]},
        }
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_down")
def test_a_c_store_stored_while_redis_is_down_is_answered_as_stored() -> None:
    server = start_receiver(host="127.0.0.1", port=0, ae_title="ICHTEST", block=False)
    assert server is not None
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
        association = ae.associate("127.0.0.1", server.server_address[1], ae_title="ICHTEST")
        assert association.is_established
        status = association.send_c_store(pydicom.dcmread(io.BytesIO(phantom_series()[0])))
        association.release()
    finally:
        server.shutdown()
    assert status.Status == 0x0000
    assert Instance.objects.count() == 1
    assert AuditEvent.objects.filter(action=AuditAction.INSTANCE_RECEIVED).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_down")
def test_stow_rs_while_redis_is_down_stores_every_part_and_says_so(user_with_role) -> None:  # type: ignore[no-untyped-def]
    client = Client(raise_request_exception=False)
    client.force_login(user_with_role("radiologist"))
    response = stow(client, multipart(*phantom_series()[:2]))
    assert response.status_code == 200, response.content[:200]
    assert Instance.objects.count() == 2
