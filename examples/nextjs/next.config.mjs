// Rewrites that mirror vercel.json: the app's API paths go to the function URLs. Locally they
// default to `scripts/dev` (cargo lambda watch on :9000). Read when the app is built (`next build`
// writes them into its routes manifest), so set CHAT_FUNCTION_URL and CHECKOUT_FUNCTION_URL then.

const withSlash = (url) => (url.endsWith("/") ? url : `${url}/`);
const chat = withSlash(process.env.CHAT_FUNCTION_URL ?? "http://127.0.0.1:9000/lambda-url/chat/");
const checkout = withSlash(
  process.env.CHECKOUT_FUNCTION_URL ?? "http://127.0.0.1:9000/lambda-url/checkout/",
);

/** @type {import('next').NextConfig} */
const nextConfig = {
  // Answers stream: a compressing proxy would hold the chat's events back until it flushes.
  compress: false,
  experimental: {
    // The chat function answers within its own budget (55 s by default); the proxy must outwait it.
    proxyTimeout: 65_000,
  },
  async rewrites() {
    return [
      { source: "/api/llm/chat", destination: chat },
      // useChat's resume probe (GET /api/llm/chat/{chatId}/stream).
      { source: "/api/llm/chat/:path*", destination: `${chat}:path*` },
      { source: "/api/pay/checkout", destination: checkout },
    ];
  },
};

export default nextConfig;
