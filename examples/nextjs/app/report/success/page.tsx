"use client";
// Stripe's success target (?session_id=cs_...): polls GET /api/pay/checkout?session_id= until the
// order is no longer pending. The checkout function reconciles with Stripe on each poll, so this
// settles even when the webhook is late.

import Link from "next/link";
import { Suspense, useEffect, useState } from "react";
import { useSearchParams } from "next/navigation";
import { AuthGate } from "@/components/auth-gate";
import { parseApiError } from "@/lib/api-error";
import { authHeaders } from "@/lib/auth";

const POLL_MS = 1000;
const MAX_POLLS = 60;

type Order = { order_id: string; status: "pending" | "paid" | "expired" | "failed"; paid_at: string | null };
type View =
  | { kind: "checking" }
  | { kind: "order"; order: Order }
  | { kind: "gave_up"; order: Order | null }
  | { kind: "error"; code: string; text: string };

export default function SuccessPage() {
  return (
    <section>
      <h1>Your purchase</h1>
      <AuthGate>
        <Suspense>
          <Status />
        </Suspense>
      </AuthGate>
    </section>
  );
}

function Status() {
  const sessionId = useSearchParams().get("session_id");
  const [view, setView] = useState<View>({ kind: "checking" });

  useEffect(() => {
    if (!sessionId) {
      setView({ kind: "error", code: "invalid_session_id", text: "This page needs the session_id Stripe adds to it." });
      return;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    let cancelled = false;
    let polls = 0;
    let last: Order | null = null;
    const poll = async () => {
      polls += 1;
      try {
        const response = await fetch(`/api/pay/checkout?session_id=${encodeURIComponent(sessionId)}`, {
          headers: await authHeaders(),
          cache: "no-store",
        });
        const text = await response.text();
        if (cancelled) return;
        if (response.ok) {
          last = JSON.parse(text) as Order;
          setView({ kind: "order", order: last });
          if (last.status !== "pending") return;
        } else if (response.status !== 429 && response.status < 500) {
          const { code, message } = parseApiError(text, response.status);
          setView({ kind: "error", code, text: message });
          return;
        }
      } catch {
        // a network hiccup: poll again
      }
      if (polls >= MAX_POLLS) setView({ kind: "gave_up", order: last });
      else timer = setTimeout(poll, POLL_MS);
    };
    poll();
    return () => {
      cancelled = true;
      clearTimeout(timer);
    };
  }, [sessionId]);

  return (
    <div className="card">
      <StatusLine view={view} />
      <Link href="/report">Back to the report</Link>
    </div>
  );
}

function StatusLine({ view }: { view: View }) {
  switch (view.kind) {
    case "checking":
      return <p data-testid="order-status" data-status="checking">Checking your payment…</p>;
    case "error":
      return (
        <p className="notice error" data-testid="order-status" data-status="error">
          Could not check this payment: {view.text} ({view.code})
        </p>
      );
    case "gave_up":
      return (
        <p className="notice" data-testid="order-status" data-status="pending">
          Still pending: Stripe has not confirmed the payment yet. Reload this page in a minute.
        </p>
      );
    case "order": {
      const { status } = view.order;
      const text = {
        pending: "Waiting for Stripe to confirm your payment… (status: pending)",
        paid: "Payment received (status: paid). The full report is yours.",
        expired: "This checkout expired before it was paid (status: expired). You have not been charged.",
        failed: "The payment did not go through (status: failed). You have not been charged.",
      }[status];
      const kind = status === "paid" ? "ok" : status === "pending" ? "" : "error";
      return (
        <p className={`notice ${kind}`} data-testid="order-status" data-status={status}>
          {text}
        </p>
      );
    }
  }
}
