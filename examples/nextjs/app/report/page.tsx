"use client";
// The full report: one button that starts Stripe Checkout through /api/pay/checkout. Also the
// checkout's cancel target (?checkout=cancelled).

import { Suspense, useState } from "react";
import { useSearchParams } from "next/navigation";
import { AuthGate } from "@/components/auth-gate";
import { parseApiError } from "@/lib/api-error";
import { authHeaders } from "@/lib/auth";

export default function ReportPage() {
  return (
    <section>
      <h1>The full report</h1>
      <p>Everything in one document, a one-time purchase.</p>
      <AuthGate>
        <Suspense>
          <Buy />
        </Suspense>
      </AuthGate>
    </section>
  );
}

type Notice = { kind: "ok" | "error" | "info"; code: string; text: string };

function noticeFor(status: number, text: string, retryAfter: string | null): Notice {
  const { code, message } = parseApiError(text, status);
  switch (code) {
    case "already_paid":
      return { kind: "ok", code, text: "You already own the full report: you have been charged once, and that's it." };
    case "payment_processing":
      return {
        kind: "info",
        code,
        text: "Your payment is being processed. You will get the report as soon as it clears; no need to pay again.",
      };
    case "rate_limited":
      return { kind: "error", code, text: `Too many attempts; try again in ${retryAfter ?? "a few"} seconds.` };
    default:
      return { kind: "error", code, text: `Checkout could not start: ${message} (${code}).` };
  }
}

function Buy() {
  const cancelled = useSearchParams().get("checkout") === "cancelled";
  const [busy, setBusy] = useState(false);
  const [notice, setNotice] = useState<Notice | null>(
    cancelled ? { kind: "info", code: "cancelled", text: "Checkout was cancelled; you have not been charged." } : null,
  );

  async function buy() {
    setBusy(true);
    setNotice(null);
    try {
      const response = await fetch("/api/pay/checkout", {
        method: "POST",
        headers: { "content-type": "application/json", ...(await authHeaders()) },
        body: "{}",
      });
      const text = await response.text();
      if (response.ok) {
        const { url } = JSON.parse(text) as { url: string };
        window.location.assign(url);
        return; // leaving for Stripe
      }
      setNotice(noticeFor(response.status, text, response.headers.get("retry-after")));
    } catch (error) {
      setNotice({ kind: "error", code: "network", text: `Checkout could not start: ${String(error)}` });
    }
    setBusy(false);
  }

  return (
    <div className="card">
      <button type="button" data-testid="buy-report" onClick={buy} disabled={busy}>
        {busy ? "Opening checkout…" : "Buy the full report"}
      </button>
      {notice && (
        <p className={`notice ${notice.kind}`} data-testid="checkout-message" data-code={notice.code}>
          {notice.text}
        </p>
      )}
    </div>
  );
}
