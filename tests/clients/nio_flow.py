"""Drives herald's embedded homeserver with matrix-nio, a mainstream Matrix client library.

Usage: python3 nio_flow.py http://127.0.0.1:PORT
Exits 0 when every step behaved as the spec says; otherwise prints the failing step and exits 1.
Run by tests/integration/clients.rs.
"""

import asyncio
import sys

import nio
from nio.api import PushRuleKind
from nio.events.account_data import PushNotify, PushSetTweak


def check(ok, what):
    """Stops at the first failure, naming it with the detail in parentheses."""
    if not ok:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what.split(' (')[0]}")


async def main(url):
    alice = nio.AsyncClient(url, "alice")
    bob = nio.AsyncClient(url, "bob")
    try:
        r = await alice.register("alice", "secret-a", device_name="alice phone")
        check(isinstance(r, nio.RegisterResponse), f"alice registers ({r})")
        r = await bob.register("bob", "secret-b", device_name="bob phone")
        check(isinstance(r, nio.RegisterResponse), f"bob registers ({r})")
        bob_id = bob.user_id

        r = await alice.whoami()
        check(isinstance(r, nio.WhoamiResponse) and r.user_id == alice.user_id, "whoami")
        r = await bob.set_displayname("Bob")
        check(isinstance(r, nio.ProfileSetDisplayNameResponse), f"bob sets a display name ({r})")

        r = await alice.room_create(name="Lunch", invite=[bob_id])
        check(isinstance(r, nio.RoomCreateResponse), f"alice creates a room ({r})")
        room = r.room_id
        r = await bob.sync(timeout=0)
        check(isinstance(r, nio.SyncResponse), f"bob's initial sync parses ({r})")
        check(room in r.rooms.invite, "bob sees the invite")
        r = await bob.join(room)
        check(isinstance(r, nio.JoinResponse), f"bob joins ({r})")
        r = await bob.sync(timeout=0, since=bob.next_batch)
        check(isinstance(r, nio.SyncResponse), "bob syncs after joining")

        r = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "lunch?"})
        check(isinstance(r, nio.RoomSendResponse), f"alice sends ({r})")
        event_id = r.event_id
        r = await alice.room_send(
            room, "m.room.message",
            {"msgtype": "m.text", "body": "Bob, at noon", "m.mentions": {"user_ids": [bob_id]}},
        )
        check(isinstance(r, nio.RoomSendResponse), "alice mentions bob")
        mention_id = r.event_id

        r = await bob.sync(timeout=5000, since=bob.next_batch)
        check(isinstance(r, nio.SyncResponse), "bob's incremental sync parses")
        joined = r.rooms.join[room]
        ids = [e.event_id for e in joined.timeline.events]
        check(event_id in ids and mention_id in ids, "bob's timeline has both messages")
        counts = joined.unread_notifications
        check(counts.notification_count == 2, f"2 unread ({counts.notification_count})")
        check(counts.highlight_count == 1, f"1 highlight ({counts.highlight_count})")

        r = await bob.update_receipt_marker(room, mention_id)
        check(isinstance(r, nio.UpdateReceiptMarkerResponse), f"bob reads ({r})")
        r = await bob.sync(timeout=0, since=bob.next_batch)
        counts = r.rooms.join[room].unread_notifications
        check(counts.notification_count == 0, "the receipt clears the count")

        r = await bob.set_pushrule(
            "global", PushRuleKind.content, "lunch", pattern="lunch",
            actions=[PushNotify(), PushSetTweak("highlight", True)],
        )
        check(isinstance(r, nio.SetPushRuleResponse), f"bob adds a content rule ({r})")
        r = await bob.enable_pushrule("global", PushRuleKind.override, ".m.rule.suppress_notices", False)
        check(isinstance(r, nio.EnablePushRuleResponse), f"bob disables a default rule ({r})")
        r = await bob.delete_pushrule("global", PushRuleKind.override, ".m.rule.master")
        check(isinstance(r, nio.DeletePushRuleError), "a server-default rule cannot be deleted")
        r = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "lunch now"})
        r = await bob.sync(timeout=5000, since=bob.next_batch)
        counts = r.rooms.join[room].unread_notifications
        check(counts.highlight_count == 1, f"bob's content rule highlights ({counts.highlight_count})")
        rules = [e for e in r.account_data_events if isinstance(e, nio.PushRulesEvent)]
        check(len(rules) == 1, "the rule change arrives as m.push_rules account data")

        message = nio.ToDeviceMessage("org.example.ping", bob_id, bob.device_id, {"n": 1})
        r = await alice.to_device(message, tx_id="ping-1")
        check(isinstance(r, nio.ToDeviceResponse), f"alice sends a to-device message ({r})")
        r = await alice.to_device(message, tx_id="ping-1")
        check(isinstance(r, nio.ToDeviceResponse), "a repeated txn id is accepted")
        r = await bob.sync(timeout=5000, since=bob.next_batch)
        pings = [e for e in r.to_device_events if getattr(e, "source", {}).get("type") == "org.example.ping"]
        check(len(pings) == 1, f"bob receives the to-device message once ({len(pings)})")
        r = await bob.sync(timeout=0, since=bob.next_batch)
        check(len(r.to_device_events) == 0, "an acknowledged to-device message is gone")
    finally:
        await alice.close()
        await bob.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
