#!/usr/bin/perl
# A sync worker written with Perl's own pack/unpack, speaking the wire
# format of AnyEvent::Fork::RPC (sync backend, octets serialiser) on
# stdin/stdout: requests `N/a*`, replies `NN/a*` with id 1, events id 0,
# payloads `(w/a*)*`. For each request it sends the event
# ("got", <number of arguments>) and replies with the arguments reversed.
use strict;
use warnings;

binmode STDIN;
binmode STDOUT;

sub frame {
    my ($id, @values) = @_;
    my $payload = pack "(w/a*)*", @values;
    my $out = pack "NN/a*", $id, $payload;
    while (length $out) {
        my $n = syswrite STDOUT, $out;
        die "write: $!" unless defined $n;
        substr($out, 0, $n) = '';
    }
}

my $buf = '';
while (1) {
    while (length $buf >= 4) {
        my $len = unpack "N", $buf;
        last if length $buf < 4 + $len;
        my $req = substr $buf, 4, $len;
        substr($buf, 0, 4 + $len) = '';
        my @args = unpack "(w/a*)*", $req;
        frame(0, "got", scalar @args);
        frame(1, reverse @args);
    }
    my $n = sysread STDIN, $buf, 65536, length $buf;
    die "read: $!" unless defined $n;
    last unless $n;
}
exit 0;
