// SPDX-License-Identifier: Apache-2.0
// A fusion-node prediction subscriber in C++, written from docs/protocol.md (§9 shows it).
// Build: g++ -std=c++17 -O2 subscriber.cpp -o subscriber -lzmq
// (Debian: libzmq3-dev cppzmq-dev libmsgpack-cxx-dev)
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

static int64_t monotonic_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct Array {                    // one payload part, copied out (parts need not be aligned)
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<unsigned char> bytes;
};

using Header = std::map<std::string, msgpack::object>;

static const msgpack::object& get(const Header& h, const char* key) {
    auto it = h.find(key);
    if (it == h.end()) throw std::runtime_error(std::string("bad_field: no ") + key);
    return it->second;
}

static size_t itemsize(const std::string& dtype) {
    if (dtype == "uint8") return 1;
    if (dtype == "int16") return 2;
    if (dtype == "int32" || dtype == "float32") return 4;
    if (dtype == "int64" || dtype == "float64") return 8;
    throw std::runtime_error("bad_dtype: " + dtype);
}

// Usage: subscriber [ENDPOINT [COUNT]]; exits after COUNT valid predictions (default: never).
int main(int argc, char** argv) {
    const char* endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:5599";  // the node's default
    long count = argc > 2 ? std::atol(argv[2]) : -1;
    zmq::context_t ctx;
    zmq::socket_t sub(ctx, zmq::socket_type::sub);
    sub.set(zmq::sockopt::subscribe, "pred.");  // both prediction topics
    sub.connect(endpoint);

    std::map<std::string, int64_t> last_seq;
    for (long received = 0; count < 0 || received < count;) {
        std::vector<zmq::message_t> parts;
        if (!zmq::recv_multipart(sub, std::back_inserter(parts))) continue;
        int64_t t_receive_ns = monotonic_ns();
        try {
            if (parts.size() < 2) throw std::runtime_error("truncated");
            if (parts.size() > 18) throw std::runtime_error("too_many_parts");
            if (parts[1].size() > 65536) throw std::runtime_error("header_too_large");
            std::string topic = parts[0].to_string();

            // unpack() throws on malformed bytes but accepts trailing ones: compare the offset.
            // convert() throws unless the object is a map with str keys. as<T>() throws on a
            // wrong type, including bool <-> int and an integer outside int64.
            std::size_t used = 0;
            msgpack::object_handle oh =
                msgpack::unpack(parts[1].data<char>(), parts[1].size(), used);
            if (used != parts[1].size() || oh.get().type != msgpack::type::MAP)
                throw std::runtime_error("bad_header");
            Header h;
            oh.get().convert(h);
            const msgpack::object& v = get(h, "v");  // the integer 1, not true or 1.0
            if (v.type != msgpack::type::POSITIVE_INTEGER || v.via.u64 != 1)
                throw std::runtime_error("unsupported_version");
            if (get(h, "kind").as<std::string>() != "prediction") continue;  // not for us
            if (get(h, "stream").as<std::string>() != topic) throw std::runtime_error("bad_topic");

            int64_t seq = get(h, "seq").as<int64_t>();
            if (seq < 0) throw std::runtime_error("bad_field: seq");
            int64_t t_ref_ns = get(h, "t_ref_ns").as<int64_t>();
            int64_t deadline_ns = get(h, "deadline_ns").as<int64_t>();
            int64_t t_publish_ns = get(h, "t_publish_ns").as<int64_t>();
            bool late = get(h, "late").as<bool>();
            std::string engine = get(h, "engine").as<std::string>();
            auto mask = get(h, "mask").as<std::map<std::string, bool>>();
            auto trace = get(h, "trace").as<std::map<std::string, int64_t>>();
            const msgpack::object& fields = get(h, "fields");
            if (fields.type != msgpack::type::MAP) throw std::runtime_error("bad_field: fields");

            // Arrays: one payload part per spec, in order; check size = product(shape) x itemsize.
            auto specs = get(h, "arrays").as<std::vector<Header>>();
            if (parts.size() < 2 + specs.size()) throw std::runtime_error("truncated");
            if (parts.size() > 2 + specs.size()) throw std::runtime_error("too_many_parts");
            std::map<std::string, Array> arrays;
            for (size_t i = 0; i < specs.size(); ++i) {
                Array a;
                std::string name = get(specs[i], "name").as<std::string>();
                a.dtype = get(specs[i], "dtype").as<std::string>();
                a.shape = get(specs[i], "shape").as<std::vector<int64_t>>();
                if (a.shape.empty() || a.shape.size() > 4) throw std::runtime_error("bad_shape");
                uint64_t expected = itemsize(a.dtype);
                for (int64_t d : a.shape) {
                    if (d < 0 || d >= (int64_t(1) << 31)) throw std::runtime_error("bad_shape");
                    expected *= uint64_t(d);  // < 2^31 * 2^26: no overflow before the check
                    if (expected > (uint64_t(64) << 20))
                        throw std::runtime_error("payload_too_large");
                }
                const zmq::message_t& part = parts[2 + i];
                if (part.size() != expected) throw std::runtime_error("size_mismatch");
                const unsigned char* begin = part.data<unsigned char>();
                a.bytes.assign(begin, begin + part.size());
                if (!arrays.emplace(name, std::move(a)).second)
                    throw std::runtime_error("bad_field: duplicate array name");
            }

            if (last_seq.count(topic) && seq != last_seq[topic] + 1)
                std::cerr << topic << ": " << seq - last_seq[topic] - 1 << " lost or restarted\n";
            last_seq[topic] = seq;

            std::cout << topic << " seq " << seq << " from " << engine
                      << ": age at receipt " << (t_receive_ns - t_ref_ns) / 1000 << " us"
                      << ", publish jitter " << (t_publish_ns - deadline_ns) / 1000 << " us"
                      << (late ? " (late)" : "") << "\n  fields " << fields << "\n";
            for (const auto& [stream, present] : mask)
                if (!present) std::cout << "  missing input: " << stream << "\n";
            for (const auto& [point, t_ns] : trace)
                std::cout << "  " << point << " = t_ref " << (t_ns - t_ref_ns) / 1000 << " us\n";
            for (const auto& [name, a] : arrays) {
                if (a.dtype != "float32") continue;
                std::vector<float> values(a.bytes.size() / sizeof(float));
                std::memcpy(values.data(), a.bytes.data(), a.bytes.size());  // little-endian host
                std::cout << "  " << name << "[0] = " << (values.empty() ? 0.f : values[0]) << "\n";
            }
            std::cout << std::flush;
            ++received;
        } catch (const msgpack::unpack_error& e) {  // drop it, count it, keep going
            std::cerr << "rejected: bad_header (" << e.what() << ")\n";
        } catch (const msgpack::type_error&) {
            std::cerr << "rejected: bad_field (a value of the wrong type)\n";
        } catch (const std::exception& e) {
            std::cerr << "rejected: " << e.what() << "\n";
        }
    }
}
