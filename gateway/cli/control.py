"""`mgw relay`, `mgw keys gen`, `mgw command sign`: the technician's and the integrator's
side of the command path."""

import datetime as _dt
import json
import os
import sys
import time
import uuid

from gateway.cli.i18n import _
from gateway.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, emit, find_meter,
                         load_config)


def main(which, args):
    if which == "keys":
        return keys_gen(args)
    if which == "command":
        return command_sign(args)
    return relay(args)


def keys_gen(args):
    from gateway.control.signing import KeyError_, generate
    try:
        priv, pub, kid = generate(args.out)
    except KeyError_ as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    except OSError as exc:
        raise CliError("%s: %s" % (args.out, exc.strerror), EXIT_FAILED) from None
    emit(args, {"private_key": priv, "public_key": pub, "kid": kid}, lambda o: print(
        "private key: %s (keep it at the head-end, mode 0600)\npublic key:  %s (copy to "
        "each gateway, list it in [control] public_keys)\nkey id:      %s"
        % (o["private_key"], o["public_key"], o["kid"])))
    return EXIT_OK


def command_sign(args):
    from gateway.control.signing import KeyError_, load_private_key, sign
    try:
        key = load_private_key(args.key)
    except KeyError_ as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    params = {}
    for item in args.param:
        if "=" not in item:
            raise CliError("--param %r: use KEY=VALUE or KEY:=JSON" % item, EXIT_USAGE)
        k, v = item.split("=", 1)
        if k.endswith(":"):
            # KEY:=JSON (as httpie): a table, list, number or true/false, e.g. an
            # account_update's grades or a config_update's patch
            k = k[:-1]
            try:
                v = json.loads(v)
            except ValueError as exc:
                raise CliError("--param %s: not JSON (%s)" % (k, exc), EXIT_USAGE) from None
        elif k == "quantities":
            v = [q for q in v.split(",") if q]
        elif k == "on":
            v = v.lower() in ("1", "true", "yes", "on")
        params[k] = v
    cmd = new_command(args.meter, args.cmd_action, params, args.valid, args.id)
    if args.publish and not args.topic:
        raise CliError(_("--publish needs --topic (such as mgw/v1/gw-0001/commands)"),
                       EXIT_USAGE)
    text = json.dumps(sign(cmd, key), ensure_ascii=False, sort_keys=True)
    print(text, flush=True)
    if args.publish:
        publish(args.publish, args.topic, text)
        sys.stderr.write(_("published to %s on %s:%d") % ((args.topic,) + args.publish) +
                         "\n")
    return EXIT_OK


def new_command(meter, action, params, valid_s, cmd_id=None):
    """An unsigned command valid from now for valid_s seconds (`mgw command sign`,
    `mgw ota serve`)."""
    now = _dt.datetime.now().astimezone().replace(microsecond=0)
    return {"v": 1, "id": cmd_id or str(uuid.uuid4()), "meter": meter, "action": action,
            "issued_at": now.isoformat(),
            "expires_at": (now + _dt.timedelta(seconds=valid_s)).isoformat(),
            "params": params}


def publish(broker, topic, payload, timeout_s=10.0):
    """One message at QoS 1, returned once the broker has acknowledged it."""
    import paho.mqtt.client as mqtt
    host, port = broker
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        client.connect(host, port, keepalive=int(timeout_s) + 5)
    except (OSError, ValueError) as exc:
        raise CliError(_("cannot reach the MQTT broker %s:%d: %s") % (
            host, port, getattr(exc, "strerror", None) or exc)) from None
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise CliError(_("the MQTT broker %s:%d did not acknowledge the command within "
                             "%.0f s") % (host, port, timeout_s))
    finally:
        client.disconnect()
        client.loop_stop()


def relay(args):
    """Through the running service's spool folder (root or the gateway's group), so the
    operation is executed by the line's owner and audited like a remote one."""
    cfg = load_config(args)
    meter = find_meter(cfg, args.meter)
    from gateway.line.reads import has_relay
    if not has_relay(meter):
        raise CliError(_("meter %s (%s) has no relay the gateway can operate")
                       % (meter.id, meter.protocol), EXIT_USAGE)
    from gateway.store import paths
    spool = paths.path(cfg.gateway.data_dir, paths.SPOOL)
    status_path = paths.status_path(cfg.gateway)
    try:
        with open(status_path) as f:
            running = paths.status_is_fresh(json.load(f), cfg.gateway.status_interval_s,
                                            time.time())
    except (OSError, ValueError, AttributeError):
        running = False
    if not running:
        raise CliError(_("the gateway service is not running (no fresh %s): start it first; "
                         "relay operations go through it so they are audited") % status_path)
    if not os.access(spool, os.W_OK):
        raise CliError(_("%s: not writable: run as root or as a member of the gateway's "
                         "group (%s)") % (spool, cfg.control.local_group), EXIT_FAILED)
    action = {"cut-off": "cut_off", "restore": "restore", "status": "status"}[args.action]
    params = {"mode": "direct"} if args.direct and action == "restore" else {}
    from gateway.control import spool as spool_mod
    try:
        rid = spool_mod.submit(spool, meter.id, action, params, args.operator)
    except spool_mod.BadRequest as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    try:
        result, taken = spool_mod.wait_result(spool, rid, 60)
    except spool_mod.BadRequest as exc:
        raise CliError(str(exc)) from None
    if result is None:
        raise CliError(_("no result within 60 s; the service took the request: see `mgw "
                         "status` and the audit trail") if taken else
                       _("no result from the service within 60 s; the request was "
                         "withdrawn"))
    ok = result.get("status") == "done"

    def human(r):
        from gateway.cli.admin import relay_word
        if ok:
            line = _("meter %s: relay %s") % (meter.id, relay_word(r.get("relay")))
            if r.get("guarantee"):
                line += _(", under guarantee")
            if r.get("awaiting_customer"):
                line += _(" (close allowed: the customer presses the meter's button)")
            print(line)
        else:
            sys.stderr.write(_("mgw relay: meter %s: %s: %s") % (
                meter.id, r.get("status"), r.get("reason")) + "\n")
    emit(args, result, human)
    return EXIT_OK if ok else EXIT_FAILED
