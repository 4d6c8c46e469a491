"""A Twisted application serving mqmq: twistd -ny examples/embed_service.tac

It listens where MQMQ_LISTEN says (Twisted endpoint descriptions, separated
by spaces), by default on 127.0.0.1:47774 and the UNIX socket /tmp/mqmq.sock.
"""

import os

from twisted.application import service
from twisted.internet import reactor

from mqmq import MQService

LISTEN = "tcp:47774:interface=127.0.0.1 unix:/tmp/mqmq.sock:mode=660"

application = service.Application("my app")
queues = MQService(reactor, os.environ.get("MQMQ_LISTEN", LISTEN).split())
queues.setServiceParent(application)
