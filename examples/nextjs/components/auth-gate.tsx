"use client";
// Shows its children to a signed-in user and a sign-in form to anyone else.

import { useState, type FormEvent, type ReactNode } from "react";
import {
  devTokenDefault,
  signInWithDevToken,
  signInWithPassword,
  signOut,
  supabase,
  useSignedIn,
} from "@/lib/auth";

export function AuthGate({ children }: { children: ReactNode }) {
  const signedIn = useSignedIn();
  if (signedIn === "loading") return <p aria-busy="true">Loading…</p>;
  if (!signedIn) return supabase ? <PasswordSignIn /> : <DevSignIn />;
  return (
    <>
      <p className="session">
        Signed in.{" "}
        <button type="button" className="link" data-testid="sign-out" onClick={() => signOut()}>
          Sign out
        </button>
      </p>
      {children}
    </>
  );
}

function PasswordSignIn() {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  async function submit(event: FormEvent<HTMLFormElement>) {
    event.preventDefault();
    const form = new FormData(event.currentTarget);
    setBusy(true);
    setError(await signInWithPassword(String(form.get("email")), String(form.get("password"))));
    setBusy(false);
  }
  return (
    <form className="card" onSubmit={submit}>
      <h2>Sign in</h2>
      <label>
        Email <input name="email" type="email" autoComplete="email" required />
      </label>
      <label>
        Password <input name="password" type="password" autoComplete="current-password" required />
      </label>
      <button type="submit" data-testid="sign-in" disabled={busy}>
        Sign in
      </button>
      {error && <p className="error">{error}</p>}
    </form>
  );
}

function DevSignIn() {
  const [token, setToken] = useState(devTokenDefault);
  return (
    <form
      className="card"
      onSubmit={(event) => {
        event.preventDefault();
        signInWithDevToken(token);
      }}
    >
      <h2>Sign in (local development)</h2>
      <p>
        No Supabase project is configured. Paste an access token from{" "}
        <code>cargo run -q -p tools --bin mint-token</code> (or build with{" "}
        <code>NEXT_PUBLIC_DEV_ACCESS_TOKEN</code>).
      </p>
      <textarea
        data-testid="dev-token"
        rows={4}
        value={token}
        onChange={(event) => setToken(event.target.value)}
        required
      />
      <button type="submit" data-testid="sign-in" disabled={token.trim() === ""}>
        Sign in with this token
      </button>
    </form>
  );
}
