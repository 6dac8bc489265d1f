import Link from "next/link";

export default function Home() {
  return (
    <section>
      <h1>saas-functions example</h1>
      <p>
        This app talks to the Rust functions through the same paths as the real frontend:{" "}
        <code>/api/llm/chat</code> (the chat, with <code>useChat</code>) and{" "}
        <code>/api/pay/checkout</code> (Stripe Checkout for the full report).
      </p>
      <ul>
        <li>
          <Link href="/chat">Ask the assistant</Link>
        </li>
        <li>
          <Link href="/report">Buy the full report</Link>
        </li>
      </ul>
    </section>
  );
}
