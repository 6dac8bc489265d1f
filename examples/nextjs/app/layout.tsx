import type { Metadata } from "next";
import Link from "next/link";
import type { ReactNode } from "react";
import "./globals.css";

export const metadata: Metadata = {
  title: "saas-functions example",
  description: "Chat and checkout through the Rust functions",
};

export default function RootLayout({ children }: { children: ReactNode }) {
  return (
    <html lang="en">
      <body>
        <header>
          <nav>
            <Link href="/">Home</Link>
            <Link href="/chat">Chat</Link>
            <Link href="/report">Full report</Link>
          </nav>
        </header>
        <main>{children}</main>
      </body>
    </html>
  );
}
